"""The adaptive-precision gateway: FastAPI app, routes, schemas, settings."""
