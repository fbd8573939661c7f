"""Where the tenants' usage is kept on one instance (the cluster's is in ``cluster/``)."""
