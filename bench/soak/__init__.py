"""The parts of the chaos soak (`bench/chaos.py`): the processes it runs and kills
(`processes`, `stack`), the fault schedule (`faults`), the message feed (`load`), and the
checks and report at the end (`audit`, `report`)."""
