# MQTT 3.1.1 server codec (compiled twin of gridgate/_mqtt_py.py).
