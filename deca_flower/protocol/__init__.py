"""The DECA protocol between the coordinator and the nodes: messages (messages.py), blocks packed
into one Flower Array (packing.py, numpy only) and their torch side (tensors.py, nodes only).

Layers: core <- protocol <- flower (Flower glue) <- apps. Nothing here imports deca_flower.flower."""
