"""The dock's panels. Each renders the Session and calls its actions; no panel imports another."""
