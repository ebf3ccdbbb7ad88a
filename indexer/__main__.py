"""`python -m actindex.indexer build …`: the entry point torchrun launches, one process per GPU."""

from .cli import main

main()
