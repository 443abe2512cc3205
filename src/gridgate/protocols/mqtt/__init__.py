"""MQTT 3.1/3.1.1: the sans-IO codec (compiled, twin codec_py), its events, and the Trio session."""
