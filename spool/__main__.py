from spool.cli.app import main

main()
