"""What the admin dashboard and ``/v1/admin/*`` show: each module reads one view of the state."""
