"""crm.html_text's fast path (replace() of the usual entities, 0051) reads text as crm.html_decode does."""

from __future__ import annotations

import psycopg

from store_sync.crm.migrations import migrate

# Store text as WooCommerce writes it (esc_html: names, line names, titles) and what could trip a
# replace() chain: entities next to each other, an entity made by decoding another, a literal '&',
# unknown and numeric entities, `&amp;` (which must not decode twice).
TRICKY = [None, "", "plain", "Fish & Chips", "x&", "&", "&&", "J&uacute;lia", "Hoodie &ndash; Blue, S",
          "M&uuml;ller &amp; S&ouml;hne", "&amp;lt;", "&amp;iacute;", "&l&#116;;", "&&iacute;;", "&#038;lt;",
          "O&#039;Brien", "O&#39;Brien", "&#0039;", "&#8217;&#x2019;&#X2019;", "&foo; &eacute;", "&nbsp;&hellip;",
          "&lt;b&gt;bold&lt;/b&gt;", "&quot;q&quot; &apos;a&apos;", "&Aacute;&Eacute;&Iacute;&Oacute;&Uacute;&Ntilde;",
          "&euro;5 &pound;4", "&ltx; &lt", "&#8211;&#8212;&#8216;&#8220;&#8221;&#8230;"]


def test_html_text_reads_text_as_the_decoder_does(crm_dsn):
    migrate(crm_dsn)
    with psycopg.connect(crm_dsn) as conn:
        rows = conn.execute("SELECT t, crm.html_text(t), crm.html_decode(t) FROM unnest(%s::text[]) t",
                            (TRICKY,)).fetchall()
    assert [(t, fast) for t, fast, _ in rows] == [(t, full) for t, _, full in rows]
    decoded = dict((t, fast) for t, fast, _ in rows)
    assert decoded["M&uuml;ller &amp; S&ouml;hne"] == "Müller & Söhne"
    assert decoded["&amp;lt;"] == "&lt;"  # decoded once, as the store meant
    assert decoded["O&#039;Brien"] == "O'Brien"
