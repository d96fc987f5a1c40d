"""Harnesses the tests and the benchmark scripts share (as huggingface_hub ships its testing
utilities). Product code never imports this package; it may import anything of quantkit.

    hub_server    a local Hub-API server (HubServer, use_hub, summarize), its parts in hub_*
    hub_stand_in  that server as a process of its own: python -m quantkit.testing.hub_stand_in
"""
