"""The order side effects: inventory, payment, shipping, email."""
