"""The order workflow and the data it exchanges."""
