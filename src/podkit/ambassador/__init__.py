"""Ambassadors: local proxies that broker an app's connections to the outside world."""
