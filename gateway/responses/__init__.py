"""OpenAI's Responses API: wire types, conversion, the response store (previous_response_id), routes."""
