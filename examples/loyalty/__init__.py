"""Reference system "loyalty": a loyalty programme whose dsrflow worker is a YAML description
(loyalty.yaml) run by the declarative SQL worker, dsrflow.sqlworker."""
