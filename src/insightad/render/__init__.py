"""Pictures people read: one colour convention for every anomaly map the product draws."""
