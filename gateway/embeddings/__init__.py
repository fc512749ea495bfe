"""POST /v1/embeddings (OpenAI's embeddings API): wire types, conversion, the route."""
