"""The Temporal worker running the order workflow and its activities."""
