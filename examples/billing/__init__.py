"""Reference system "billing": customers, invoices and payments, with a legal retention rule."""
