"""Static code lists the sandbox seeds into its table of tables.

Names keep the HTML entities a real store returns (``Amap&aacute;``), because clients must cope.
"""

from __future__ import annotations

ORDER_STATUSES = [
    # code, label, is_paid
    ("pending", "Pending payment", 0),
    ("processing", "Processing", 1),
    ("on-hold", "On hold", 0),
    ("completed", "Completed", 1),
    ("cancelled", "Cancelled", 0),
    ("refunded", "Refunded", 0),
    ("failed", "Failed", 0),
    ("checkout-draft", "Draft", 0),
]
ORDER_STATUS_LABELS = {code: label for code, label, _ in ORDER_STATUSES}
PAID_STATUSES = {"processing", "completed"}

SUBSCRIPTION_STATUSES = [
    ("pending", "Pending"),
    ("active", "Active"),
    ("on-hold", "On hold"),
    ("cancelled", "Cancelled"),
    ("switched", "Switched"),
    ("expired", "Expired"),
    ("pending-cancel", "Pending Cancellation"),
]
SUBSCRIPTION_STATUS_LABELS = dict(SUBSCRIPTION_STATUSES)

PAYMENT_GATEWAYS = [
    # id, title, method_title, enabled
    ("bacs", "Direct bank transfer", "Direct bank transfer", 1),
    ("cheque", "Check payments", "Check payments", 0),
    ("cod", "Cash on delivery", "Cash on delivery", 1),
    ("stripe", "Credit Card (Stripe)", "Stripe", 1),
    ("paypal", "PayPal", "PayPal Standard", 1),
]

TAX_CLASSES = [("standard", "Standard rate"), ("reduced-rate", "Reduced rate"), ("zero-rate", "Zero rate")]

# country code, name, currency, [(state code, state name)]
COUNTRIES = [
    ("ES", "Spain", "EUR", [("M", "Madrid"), ("B", "Barcelona"), ("V", "Valencia"), ("SE", "Sevilla"),
                            ("MU", "Murcia"), ("A", "Alicante"), ("PO", "Pontevedra")]),
    ("US", "United States (US)", "USD", [("CA", "California"), ("NY", "New York"), ("TX", "Texas"),
                                          ("FL", "Florida"), ("WA", "Washington")]),
    ("PE", "Peru", "PEN", [("LIM", "Lima"), ("CUS", "Cusco"), ("ARE", "Arequipa")]),
    ("BR", "Brazil", "BRL", [("AC", "Acre"), ("AP", "Amap&aacute;"), ("SP", "S&atilde;o Paulo")]),
    ("MX", "Mexico", "MXN", [("CMX", "Ciudad de M&eacute;xico"), ("JAL", "Jalisco")]),
    ("FR", "France", "EUR", []),
    ("GB", "United Kingdom (UK)", "GBP", []),
    ("DE", "Germany", "EUR", []),
]
# "M" exists both in Spain and, below, nowhere else; "CA" is California and also a country code:
# state codes are unique only within their country.

CURRENCIES = [("EUR", "Euro", "&euro;"), ("USD", "United States (US) dollar", "&#36;"),
              ("GBP", "Pound sterling", "&pound;"), ("PEN", "Sol", "S/"), ("BRL", "Brazilian real", "&#082;&#036;"),
              ("MXN", "Mexican peso", "&#36;")]

# slug, name, parent slug (None = root). Depth up to 4; one orphan whose parent was deleted.
CATEGORIES = [
    ("uncategorized", "Uncategorized", None),
    ("courses", "Courses", None),
    ("programming", "Programming", "courses"),
    ("python", "Python", "programming"),
    ("data-engineering", "Data Engineering", "programming"),
    ("airflow", "Airflow &amp; Orchestration", "data-engineering"),
    ("languages", "Languages", "courses"),
    ("spanish", "Espa&ntilde;ol", "languages"),
    ("merch", "Merchandise", None),
    ("clothing", "Clothing", "merch"),
    ("t-shirts", "T-shirts", "clothing"),
    ("hoodies", "Hoodies", "clothing"),
    ("books", "Books", "merch"),
    ("memberships", "Memberships", None),
]

ATTRIBUTES = {"Color": ["Black", "White", "Red"], "Size": ["S", "M", "L", "XL"]}

FIRST_NAMES = ["Ana", "Luis", "Mar&iacute;a", "John", "Jane", "Pedro", "Luc&iacute;a", "Carlos", "Emma", "Noah",
               "Sof&iacute;a", "Mateo", "Olivia", "Liam", "Valentina", "Diego", "Chlo&eacute;", "Jos&eacute;"]
LAST_NAMES = ["Garc&iacute;a", "Smith", "P&eacute;rez", "Johnson", "L&oacute;pez", "Brown", "Mart&iacute;nez",
              "Silva", "Rossi", "M&uuml;ller", "Dubois", "Quispe", "Fern&aacute;ndez", "Taylor"]
CITIES = {"ES": ["Madrid", "Barcelona", "Valencia"], "US": ["San Francisco", "New York", "Austin"],
          "PE": ["Lima", "Cusco"], "BR": ["S&atilde;o Paulo", "Rio Branco"], "MX": ["Guadalajara"],
          "FR": ["Paris", "Lyon"], "GB": ["London", "Leeds"], "DE": ["Berlin", "K&ouml;ln"]}

COURSE_TITLES = ["Python from Zero", "Data Engineering with Airflow", "SQL for Analysts", "Spanish A1",
                 "Spanish B2 &ndash; Business", "Advanced Postgres", "dbt in Practice", "Streaming 101"]
MERCH_TITLES = ["Logo T-shirt", "Zip Hoodie", "Coffee Mug", "The Data Book", "Sticker Pack"]
