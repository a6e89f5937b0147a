from slmops_rollout.app import main

main()
