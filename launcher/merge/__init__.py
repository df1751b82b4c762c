"""`calm merge`: the command line of the merge job (the job itself is the merge package)."""
