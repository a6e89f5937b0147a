from slmops_optimizer.app import main

main()
