"""The bottom layer: errors, events and reporters' protocol, the process group and signal handling."""
