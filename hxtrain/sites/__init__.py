"""A site as its own process: the site's program and state, its process and command, the launcher."""
