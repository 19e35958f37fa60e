"""Reference systems for dsrflow: a CRM and a billing system, each with its own PostgreSQL
database, seed data and worker. See examples/README.md."""
