"""What the commands share at run time: starting Ray, worker start-up and errors, progress, quiet output,
run folders and logs, Ray authentication."""
