"""Optional integrations, each behind an extra: nothing in the core library imports them."""
