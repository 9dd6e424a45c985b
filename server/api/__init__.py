"""The API: the OrderService RPCs, request validation, conversions and the error vocabulary."""
