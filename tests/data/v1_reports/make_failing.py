"""A failing v1 report: the adapted net fed the wrong spec (rgb01 instead of rgb255), as tests/verify/test_report_browser.py does."""
# Run at main b5bd205 (the README says how); later bbadapt returns a CheckReport, not this dict.
import sys

from bbadapt.core.rewrite import adapt
from bbadapt.verify.equivalence import CheckOptions, check
from bbadapt.verify.report import write_reports
from tests.conftest import calibrated

net = calibrated("cifar_resnet20_v1")
exact = adapt(net, "cifar", "rgb255", fold="bn", bn="fused")
report = check(net, "cifar", exact.net, "rgb01", CheckOptions(sizes=[(32, 32)], cifar=True))
report["model"] = "cifar_resnet20_v1"
write_reports(report, sys.argv[1])
