"""Data curation before tokenisation: ``megagpt clean`` (filters, deduplication, report)."""
