"""What the API does over Temporal: the order workflows, listing and watching orders."""
