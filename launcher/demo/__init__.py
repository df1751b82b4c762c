"""`calm demo`: the key-value arithmetic experiment on an embedded local Ray."""
