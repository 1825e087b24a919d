-- Orders, in creation order. `seq` is the paging key: AUTOINCREMENT never reuses a value, so a page
-- token stays valid however the table changes.
CREATE TABLE orders (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT    NOT NULL UNIQUE,
    -- Idempotency key of the CreateOrder call that made the order; NULL when none was given.
    request_id         TEXT    UNIQUE,
    -- JSON array of strings.
    items              TEXT    NOT NULL,
    description        TEXT    NOT NULL,
    price_cents        INTEGER NOT NULL CHECK (price_cents >= 0),
    destination        TEXT    NOT NULL,
    status             TEXT    NOT NULL CHECK (status IN ('PENDING', 'SHIPPED')),
    create_time        TEXT    NOT NULL,
    update_time        TEXT    NOT NULL,
    -- Lower-cased copies for SearchOrders: SQLite's lower() folds ASCII only, so the service folds
    -- the text itself (Unicode-aware) when it writes.
    items_folded       TEXT    NOT NULL,
    description_folded TEXT    NOT NULL
);
