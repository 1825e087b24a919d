-- Orders, in creation order. `seq` is the paging key; inserts take a transaction-level advisory lock
-- so that sequence order is also commit order (see store/postgres.rs).
CREATE TABLE orders (
    seq         BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          UUID        NOT NULL UNIQUE,
    -- Idempotency key of the CreateOrder call that made the order; NULL when none was given.
    request_id  TEXT        UNIQUE,
    items       TEXT[]      NOT NULL,
    description TEXT        NOT NULL,
    price_cents BIGINT      NOT NULL CHECK (price_cents >= 0),
    destination TEXT        NOT NULL,
    status      TEXT        NOT NULL CHECK (status IN ('PENDING', 'SHIPPED')),
    create_time TIMESTAMPTZ NOT NULL,
    update_time TIMESTAMPTZ NOT NULL
);
