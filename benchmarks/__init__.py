"""Every benchmark: the suite behind `make bench`, per hop, the split planner, and our stage against peer servers.

The top layer with `loadtest`: it may import every product package, and none of them imports it.
"""
