"""MoE routing of an artifact: routing_analysis (the statistics) and routing_report (the plots)."""
