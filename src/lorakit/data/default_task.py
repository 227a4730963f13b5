RECOMMENDED = {}
def default_task(*a, **k): raise NotImplementedError
