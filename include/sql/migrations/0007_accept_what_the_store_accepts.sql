-- The CRM takes what the store takes: a record the store accepted is a fact, and a narrower model
-- only hides it (the rest waits in sync.transform_quarantine, 0008).

-- Money without precision or scale: the store has no limit (IDR and VND totals pass 10^10, some
-- extensions keep 6 decimals). Dropping a numeric typmod rewrites nothing.
ALTER TABLE crm.product ALTER price TYPE numeric, ALTER regular_price TYPE numeric, ALTER sale_price TYPE numeric,
    -- stock is a decimal in the store when a plugin sells by weight or length (2.5 kg)
    ALTER stock_quantity TYPE numeric;
ALTER TABLE crm.sales_order ALTER discount_total TYPE numeric, ALTER discount_tax TYPE numeric,
    ALTER shipping_total TYPE numeric, ALTER shipping_tax TYPE numeric, ALTER cart_tax TYPE numeric,
    ALTER total TYPE numeric, ALTER total_tax TYPE numeric;
ALTER TABLE crm.sales_order_line ALTER subtotal TYPE numeric, ALTER subtotal_tax TYPE numeric,
    ALTER total TYPE numeric, ALTER total_tax TYPE numeric;
ALTER TABLE crm.sales_order_line_tax ALTER total TYPE numeric, ALTER subtotal TYPE numeric;
ALTER TABLE crm.sales_order_tax ALTER tax_total TYPE numeric, ALTER shipping_tax_total TYPE numeric;
ALTER TABLE crm.sales_order_shipping ALTER total TYPE numeric, ALTER total_tax TYPE numeric;
ALTER TABLE crm.sales_order_fee ALTER total TYPE numeric, ALTER total_tax TYPE numeric;
ALTER TABLE crm.sales_order_coupon ALTER discount TYPE numeric, ALTER discount_tax TYPE numeric;
ALTER TABLE crm.refund ALTER amount TYPE numeric;
ALTER TABLE crm.refund_line ALTER total TYPE numeric, ALTER total_tax TYPE numeric;
ALTER TABLE crm.subscription ALTER total TYPE numeric;
ALTER TABLE crm.subscription_line ALTER total TYPE numeric, ALTER total_tax TYPE numeric;

-- A country the store took as free text ("Germany", "Deutschland") is kept as it came beside the
-- code, which stays an ISO code (or NULL) so the code list keeps meaning something.
ALTER TABLE crm.customer_address ADD COLUMN IF NOT EXISTS country_raw text;
ALTER TABLE crm.sales_order_address ADD COLUMN IF NOT EXISTS country_raw text;
COMMENT ON COLUMN crm.customer_address.country_raw IS 'the country as the store sent it, when it is not an ISO code';
COMMENT ON COLUMN crm.sales_order_address.country_raw IS 'the country as the store sent it, when it is not an ISO code';

-- The ISO code in a country field, upper-cased; NULL when the field holds something else.
CREATE OR REPLACE FUNCTION crm.country_code(t text) RETURNS char(2) LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN btrim(t) ~ '^[A-Za-z]{2}$' THEN upper(btrim(t)) END
$$;

-- Slugs are unique among the store's live terms only: a slug freed by a delete is reused, and two
-- categories swap slugs in two writes the CRM may see in either order. The id is the key.
ALTER TABLE crm.product_category DROP CONSTRAINT IF EXISTS product_category_slug_key;
