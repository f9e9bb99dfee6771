"""How block servers come to exist: child processes here (:mod:`.local`), Ray actors on a cluster
(:mod:`.ray_launcher`), or started by hand (the orchestrator is given their addresses)."""
