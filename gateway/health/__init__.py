"""/health, /metrics and the status page: what the server reports about itself."""
