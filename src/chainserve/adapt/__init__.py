"""Online adaptation of the plan to the arrival rate (beyond the paper: §4.3 names its static plan
as a limit). Pure and clock-free: rate estimation (:mod:`.estimate`), change detection
(:mod:`.detect`), the cost of a plan change (:mod:`.cost`) and the controller that ties them together
(:mod:`.controller`), driven alike by the simulator and the serving runtime."""
