# Payload validator (compiled twin of gridgate/_payload_py.py).
