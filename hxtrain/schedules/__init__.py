"""Pipeline schedules as plain data (task tables), the discrete-event simulator, and timelines."""
