"""The models on this machine: /v1/models and the admin API (load, unload, pin, unpin), its terminal client."""
