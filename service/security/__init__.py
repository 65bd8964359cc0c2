"""Who may call: bearer tokens and repository-control policy; TLS for the listening ports."""
