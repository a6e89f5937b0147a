from slmops_validator.app import main

main()
