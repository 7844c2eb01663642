"""invoice-proxy: serves PlanetScale invoices to internal callers without sharing the token."""

__version__ = "0.1.0"
