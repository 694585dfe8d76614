"""Store backends for the parametrised suite.

Each module lists its backend names in `BACKENDS` and defines, for each name N, a
function-scoped fixture `store_N` that yields a `PersistenceLayer` with no records
left over from other tests. `tests/conftest.py` runs every engine behaviour test
against all of them.
"""
