"""HTTP/1.1: the request parser twin, the fast and std engines, and the endpoints both serve."""
