"""The async source: engine, lease, decorators and stores (the sync twin is generated from it)."""
