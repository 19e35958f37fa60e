"""Reference system "crm": contacts, their addresses and staff notes."""
