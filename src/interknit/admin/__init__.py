"""The node's own HTTP face: the status page, /v1/health, /metrics, and the API's middlewares."""
