import sys

from .run import main

if sys.argv[1:2] == ["scale"]:  # the scale row (bench/scale.py): WORKERS=1 against 2, and the hop
    from .scale import main as scale

    raise SystemExit(scale(sys.argv[2:]))
if sys.argv[1:2] == ["saturation"]:  # throughput at saturation under wrk (bench/saturation.py)
    from .saturation import main as saturation

    raise SystemExit(saturation(sys.argv[2:]))
raise SystemExit(main())
